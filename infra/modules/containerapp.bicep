// The Container Apps environment and the Lamina app: HTTPS ingress on port 8000, the
// user-assigned identity (for the image pull, Key Vault references and every Azure
// call), probes on the health routes, and HTTP-concurrency scaling between the replica
// bounds.

param environmentName string
param appName string
param location string
param tags object

@description('Log Analytics workspace receiving the console logs.')
param workspaceName string

@description('Resource id of the user-assigned identity.')
param identityId string

param image string

@description('Registry the identity pulls the image from (login server).')
param registryServer string

@description('Container environment: [{ name, value } or { name, secretRef }].')
param env array

@description('Secrets as Key Vault references: [{ name, keyVaultUrl }].')
param keyVaultSecrets array

@minValue(0)
param minReplicas int

@minValue(1)
param maxReplicas int

@description('Concurrent requests per replica before another is added.')
@minValue(1)
param concurrentRequests int

@description('vCPU per replica, e.g. \'1.0\'.')
param cpu string

@description('Memory per replica, e.g. \'2Gi\' (twice the vCPU count on Consumption).')
param memory string

var port = 8000

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: workspaceName
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: environmentName
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: workspace.properties.customerId
        sharedKey: workspace.listKeys().primarySharedKey
      }
    }
  }
}

resource app 'Microsoft.App/containerApps@2024-03-01' = {
  name: appName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    managedEnvironmentId: environment.id
    configuration: {
      activeRevisionsMode: 'Single'
      ingress: {
        external: true
        targetPort: port
        transport: 'auto'
        allowInsecure: false
      }
      registries: [ { server: registryServer, identity: identityId } ]
      secrets: [for secret in keyVaultSecrets: {
        name: secret.name
        keyVaultUrl: secret.keyVaultUrl
        identity: identityId
      }]
    }
    template: {
      containers: [
        {
          name: 'lamina'
          image: image
          resources: { cpu: json(cpu), memory: memory }
          env: env
          probes: [
            // Start-up allows for imports and opening stores before liveness counts.
            {
              type: 'Startup'
              httpGet: { path: '/healthz', port: port }
              periodSeconds: 3
              failureThreshold: 20
            }
            {
              type: 'Liveness'
              httpGet: { path: '/healthz', port: port }
              periodSeconds: 10
              failureThreshold: 3
            }
            // /readyz is 503 until the stores are open and the index is readable.
            {
              type: 'Readiness'
              httpGet: { path: '/readyz', port: port }
              periodSeconds: 5
              failureThreshold: 3
            }
          ]
        }
      ]
      scale: {
        minReplicas: minReplicas
        maxReplicas: maxReplicas
        rules: [
          {
            name: 'http-concurrency'
            http: { metadata: { concurrentRequests: string(concurrentRequests) } }
          }
        ]
      }
    }
  }
}

output fqdn string = app.properties.configuration.ingress.fqdn
